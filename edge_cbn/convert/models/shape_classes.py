"""The classes of the synthetic shape scenes (`edge_cbn.lab.scenes.synthetic_scenes`) and of the models trained on
them (`shapes.py`).  No TensorFlow here: the scene generator imports it on machines without it.

COCO numbering: category id `i + 1` is `SHAPE_CLASSES[i]`.  VOC numbering: mask value `i + 1` is
`SHAPE_CLASSES[i]`, 0 is the background and 255 the void band on object borders."""
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross")
SEGMENTATION_CLASSES = ("background",) + SHAPE_CLASSES
