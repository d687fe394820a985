"""What the lab shows the models: `photos` (the natural photos scikit-image and scikit-learn ship),
`sample_clip` (the bundled clip's generator, `python -m edge_cbn.lab.scenes.sample_clip`) and
`synthetic_scenes` / `synthetic_datasets` (seeded shape scenes on those photos, or on `procedural` textures
no training scene used, written as COCO and VOC2012).
May import `runtime`, `stream` and `convert.models`' TensorFlow-free parts; never another lab room."""
