"""What turns a photo or a text into numbers: ImageNet backbones, OCR, text encoders."""
