"""What measures the product, in three rooms and a module: `evaluate/` (recovery under noise), `bench/`
(speed), `scenes/` (the natural photos the packages ship, the bundled clip's generator, the synthetic shape
scenes) and `divergence` (the paper's Fig. 1).  May import every side."""
