"""Offline TCA calibration: `python -m calibration --model PATH --out FILE`."""
