"""The service: `create_app(ServeConfig)` is a FastAPI app that classifies products from a photo and a title."""
