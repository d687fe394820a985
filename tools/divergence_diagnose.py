#!/usr/bin/env python3
"""Why a layer's BN-output divergence in `edge-cbn divergence` is large: per channel, the histogram KL of
the calibrated noisy output against the clean one beside the moments of the two and the share of the clean
values that sit exactly at their minimum (a point mass on the first bin's edge, which a tiny shift moves
into another bin).

    python tools/divergence_diagnose.py _blocks.15._bn1 --limit 48   # EfficientNet-Lite0, relative 0.05, chip 0
"""
import argparse

import numpy as np

from edge_cbn.convert.offline_calibration import bn_layers, keras_noise_targets, set_kernels
from edge_cbn.lab import divergence as dv
from edge_cbn.lab.evaluate.command import EVAL_FRAME0
from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.stream.resolve import resolve_model


def main(layer: str, limit: int) -> None:
    bundle = load_bundle(resolve_model(None, echo=lambda *a, **k: None))
    setting = dv.Setting("relative", 0.05, 0)
    eval_x, cal, _, _ = dv.choose_inputs(bundle, None, None, limit, 192, "all")
    model = dv.keras_model_of(bundle)
    bns = bn_layers(model)
    bn = next(b for b in bns if b.name == layer)
    probe = dv.bn_input_probe(model, [bn])
    source, calibrated = dv.bn_statistics(bns), dv.device_statistics(bundle, setting, cal)
    chip, clean_kernels = setting.chip(keras_noise_targets(model)), {n: k for n, (_, k) in keras_noise_targets(model).items()}

    def inputs(noisy: bool) -> np.ndarray:
        out = []
        for i, x in enumerate(dv.keras_batches(bundle, eval_x, 8)):
            if noisy:
                set_kernels(model, chip.perturb(EVAL_FRAME0 + i))
            out.append(np.asarray(probe(x, training=False)).reshape(-1, bn.moving_mean.shape[0]))
        set_kernels(model, clean_kernels)
        return np.concatenate(out)

    z_clean = inputs(False)
    dv.set_bn_statistics(bns, calibrated)
    z_noisy = inputs(True)
    dv.set_bn_statistics(bns, source)
    eps = float(bn.epsilon)
    clean, noisy = dv.normalised(z_clean, source[layer], eps), dv.normalised(z_noisy, calibrated[layer], eps)
    bins = dv.ChannelBins(clean.min(0), clean.max(0), setting.bins)
    def histogram(z):  # the estimator before the zero atom: what this tool diagnoses
        return dv.smoothed(dv.channel_histograms(z, bins, np.zeros(z.shape, bool)), setting.epsilon)

    kl = dv.kl_divergence(histogram(clean), histogram(noisy))
    std = np.maximum(clean.std(0), 1e-12)
    at_min = (clean == bins.lo).mean(0)
    print(f"{layer}, {limit} crops, {len(kl)} channels: mean histogram KL of the outputs {kl.mean():.3g}")
    print(f"median |mean difference| {np.median(np.abs(noisy.mean(0) - clean.mean(0)) / std):.3g} clean std, "
          f"median std ratio {np.median(noisy.std(0) / std):.3g}")
    big = kl > 1
    print(f"channels with KL > 1: {big.sum()}; of them, median share of clean values at the channel's minimum "
          f"{np.median(at_min[big]):.2f} (the others: {np.median(at_min[~big]):.2f}); their share of the KL "
          f"{kl[big].sum() / kl.sum():.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer")
    parser.add_argument("--limit", type=int, default=48)
    args = parser.parse_args()
    main(args.layer, args.limit)
