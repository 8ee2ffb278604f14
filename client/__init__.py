"""The node: local data, DP-SGD training, the privacy ledger, and the Flower ClientApp."""
