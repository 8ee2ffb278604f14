"""fedsafe: federated, privacy-preserving deep learning on Flower, PyTorch and Opacus."""
