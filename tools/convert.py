#!/usr/bin/env python3
"""Offline (workstation) conversion and calibration: `python tools/convert.py --help`."""
from edge_cbn.convert.command import main

if __name__ == "__main__":
    main()
