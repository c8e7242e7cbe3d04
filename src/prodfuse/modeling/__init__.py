"""The fusion model: layers, architecture, training loop, run folders, metrics.

`import prodfuse.modeling.fusion` registers the fusion layers with Keras, so a saved model.keras then loads with
plain `keras.models.load_model` (Run.load does it for you). It is not imported here, so that the light modules
of this package (config) do not pull in TensorFlow.
"""
