#!/usr/bin/env python3
"""Writes assets/demo/new_species/ (the `new_species` test profile's inputs), seeded and offline:
see src/uce_nf/demo_newspecies.py."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from uce_nf.demo_newspecies import write_new_species_demo  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent.parent / "assets/demo/new_species")
    print(write_new_species_demo(p.parse_args().dest))
