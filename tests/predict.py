"""Preprocess -> invoke -> postprocess of a bundle in one call: the tests' shorthand for the pieces that
`stream.Engine` runs (Processor + an interpreter of the bundle)."""
from edge_cbn.runtime.interpreter import io_indices, run_interpreter
from edge_cbn.runtime.noisy_model import NoisyModel
from edge_cbn.runtime.processing import Processor


class Predictor(Processor):
    def __init__(self, bundle, interpreter=None, num_threads=None, **options):
        super().__init__(bundle, **options)
        self.interpreter = interpreter or NoisyModel(bundle, num_threads=num_threads).interpreter(0)

    def invoke(self, x):
        return run_interpreter(self.interpreter, *io_indices(self.interpreter), x)

    def __call__(self, frame_bgr, max_results=None):
        x, ctx = self.preprocess(frame_bgr)
        return self.postprocess(self.invoke(x), ctx, max_results)
