"""`edge-cbn stream`, the device app: the command (`command`), what it can be told (`options`), the model
side of a frame (`engine`, with `persistence` and `agreement`), the loop (`loop`) and where frames come
from and go to (`resolve`, `sources`, `sample`, `overlay`, `outputs`, `preview`).  Imports
`edge_cbn.runtime`; never TensorFlow, the converter or the lab."""
from .engine import Engine, FrameResult
from .loop import StreamLoop
from .options import StreamError, StreamOptions
from .resolve import load_model, open_frames

__all__ = ["Engine", "FrameResult", "StreamError", "StreamLoop", "StreamOptions", "load_model", "open_frames"]
