"""What training and serving must agree on: configs (:mod:`.config`, :mod:`.config_schema`),
errors, the batch of named sparse features and its byte codec (:mod:`.batch`,
:mod:`.batch_codec`, :mod:`.batch_kernels`), the dense model spec and sparse optimizer settings."""
