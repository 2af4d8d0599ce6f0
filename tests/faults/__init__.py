"""Fault injection: full disks, unwritable paths, signals, damaged and hostile files (issue 19)."""
