"""What measures the product, in three rooms and two modules: `evaluate/` (recovery under noise), `bench/`
(speed), `scenes/` (the natural photos the packages ship, the bundled clip's generator, the synthetic shape
scenes), `divergence` (the paper's Fig. 1) and `plot` (a stream's --log as charts).  May import every side."""
