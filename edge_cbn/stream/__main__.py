"""python -m edge_cbn.stream: the same as `edge-cbn stream` (one-line errors included)."""
import sys

from ..cli import main

main(["stream", *sys.argv[1:]])
