"""The import path PERSIA's older documents use for the embedding optimizers (``persia.sparse.optim``)."""
