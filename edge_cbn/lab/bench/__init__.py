"""`edge-cbn bench …`: speed, memory and convergence.  `command` (the click group and `bench models`),
`timing` (the helpers the bench modules share; it imports none of them), one module per measurement (`stream`, `converge`, `soak`, `refold` for
`bench refold`, `calibrate`, `sweep`), `sweep_projection` (the paper's sweeps projected from per-image
costs) and `statistics` (how far apart two sets of BN statistics are).  May import `runtime`, `stream`,
`convert`, `cluster`, the root `options`, `lab.evaluate` and `lab.scenes`; no other room imports it."""
