"""`edge-cbn evaluate`: recovery under noise.  `command` (the click group; agreement on natural photos),
`tasks` (`evaluate classification|detection|segmentation`) on `labelled` (the paper's Tables 1-3 on a
labelled dataset) with its `datasets` readers, `metrics` and `report`, and `parallel_sweep` / `sweep_worker`
(the labelled sweep as units on local workers or Ray; `tasks` imports them, they import `labelled`).
May import `runtime`, `stream`, `convert`, `cluster`, the root `cli` / `options`, and `lab.scenes`;
never `lab.bench` or `lab.divergence`."""
