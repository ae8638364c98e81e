"""ControlNet: control images from input images (preprocessors that need no downloaded weights) and
their fitting to the generation size, as AUTOMATIC1111's sd-webui-controlnet extension makes them.

Import from :mod:`sdstudio.control.preprocess` (``preprocess``, ``PREPROCESSORS``, ``resize_control``, ...);
nothing is re-exported here, so the module's name is not shadowed by its ``preprocess`` function."""
