"""`edge-cbn stream --state FILE`: resume the calibration on start, save it while calibrating and at
exit (the files, their atomic writes and their checks: `edge_cbn.runtime.state`).  A state that fails its
checks never stops the stream: it is set aside with one warning and the stream starts fresh; one saved for
another setup is kept under that setup's name before a calibrating stream saves its own."""
from __future__ import annotations

import time

from ..runtime.errors import BadInput
from ..runtime.refold import Refolder
from ..runtime.state import OtherSetup, Resumed, Saver, Snapshot, StateStore, fingerprint, setup_label
from ..runtime.validation import one_line
from .options import StreamOptions, warn


class Persistence:
    """The state file of one source bundle and stream setup.  Saves need a calibrating stream; a stream
    that does not calibrate only resumes, serving the saved statistics frozen."""

    def __init__(self, bundle, opts: StreamOptions, *, calibrating: bool, sweep: bool = False):
        n_bns = len(bundle.meta.get("calibration", {}).get("bns", []))
        self.name, self.calibrating, self.save_interval = opts.state, calibrating, opts.save_interval
        self.store = StateStore(opts.state, bundle, fingerprint(
            bundle, noise=opts.noise, eta=opts.eta if opts.noise_on else 0.0, seed=opts.seed,
            noise_options=opts.noise_options, mode=opts.mode,
            stages=opts.warmup_frames if sweep else min(opts.stages, n_bns) or 1, sweep=sweep))
        self.store.remove_stale_temporaries()
        self.saver = self._saved_model = None
        if calibrating:
            self.store.check_writable()  # a --state that cannot be saved is one line at start, not a warning per save
            self.saver = Saver(self.store, on_error=lambda e: warn(f"cannot save the state to {opts.state}: {e}"))
            self._saved_model = Refolder(bundle)  # clean weights + calibrated statistics: the model saved
        self._last_save = time.monotonic()

    @classmethod
    def open(cls, bundle, opts: StreamOptions, *, calibrating: bool, sweep: bool = False) -> "Persistence | None":
        """None without --state, or (with a warning) for a bundle without its sidecar; `sweep`: the stream
        calibrates through the sweep variant (its states are not the depth-first warm-up's)."""
        if not opts.state:
            return None
        if not bundle.has_sidecar:
            warn(f"--state ignored: {bundle.path.name} has no refold sidecar")
            return None
        return cls(bundle, opts, calibrating=calibrating, sweep=sweep)

    def resume(self, calibrator=None) -> Resumed | None:
        """The saved state, its calibrator part loaded into `calibrator`; None (with one warning, never an
        exception: whatever is wrong with the file) when there is none or it cannot be used.  A state
        that fails its checks is set aside, and a calibrating stream keeps one of another setup under
        that setup's name, so neither is resumed nor saved over."""
        if not self.store.path.exists():
            return None
        try:
            # Without calibration the saved statistics are served frozen: mode and stages do not matter.
            return self.store.load(ignore=() if self.calibrating else ("mode", "stages"), calibrator=calibrator)
        except OtherSetup as e:
            if not self.calibrating:  # nothing will be saved over it
                warn(f"state {self.name} not used ({e.reason}); starting fresh")
                return None
            moved = self.store.set_aside("setup-" + setup_label(e.saved))
            kept = (f"kept as {moved.name}, which --state resumes with that setup" if moved
                    else "it could not be moved and will be replaced")
            warn(f"state {self.name} not used ({e.reason}): {kept}; starting fresh")
        except Exception as e:  # noqa: BLE001 - BadInput, or whatever a check missed: the stream goes on
            reason = e.reason if isinstance(e, BadInput) else f"{type(e).__name__}: {e}"
            moved = self.store.set_aside()
            kept = f"set aside as {moved.name}" if moved else "it could not be set aside and will be replaced"
            warn(f"state {self.name} not used ({one_line(reason)}): {kept}; starting fresh")
        return None

    def due(self, force: bool = False) -> bool:
        """A save is due: forced, or --save-interval seconds since the last one."""
        return self.saver is not None and (force or time.monotonic() - self._last_save >= self.save_interval)

    def save(self, stats: dict, calibrator_state: dict, counters: dict) -> None:
        """Hand a snapshot to the background saver (the newest waiting one wins)."""
        self._last_save = time.monotonic()
        self._saved_model.refold(stats)
        self.saver.submit(Snapshot(stats, calibrator_state, self._saved_model.model_bytes(), counters))

    def flush(self) -> None:
        if self.saver is not None:
            self.saver.flush()

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()
