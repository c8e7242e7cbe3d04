"""Loading a run and predicting with it: run folders, calibration, the Predictor."""
