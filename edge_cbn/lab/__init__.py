"""What measures the product: `evaluate` (recovery under noise), `bench` (speed), `photos` (the natural
photos the packages ship) and `sample_clip` (the bundled clip's generator).  May import every side."""
