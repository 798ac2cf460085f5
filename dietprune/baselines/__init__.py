"""Structured baselines for comparison with DIET; their specs and configs are in ``dietprune.registry``.

Pure scores (``scores``) are separate from the code that cuts a model in place (``heads``,
``channels``, ``layers``, ``bias``); ``plan`` matches a parameter budget with the widths a stock
config can express, ``calib`` collects the calibration statistics, and ``methods`` registers
``agnostic``, ``wanda-sp``, ``flap`` and ``shortgpt``.
"""
