"""Fault injection: kills, damaged files, disk and numerical faults, outages, bad configs."""
