"""Talking to registries: the OCI distribution API (pull, push), manifests, credentials.

- :mod:`.registry`: endpoints (TLS, ``insecure-registries``, ``registry-mirrors``), HTTP
  with bearer-token and basic auth, registry errors in Docker's words;
- :mod:`.manifest`: Docker schema 2 / OCI manifests and indexes, platform selection;
- :mod:`.pull`: verified, parallel, streaming pull into the Graph;
- :mod:`.push`: HEAD checks, cross-repository mounts, uploads, manifest put;
- :mod:`.credentials`: a ``config.json`` like Docker's (``auths``), for the CLI;
- :mod:`.progress`: Docker's jsonmessage progress lines.
"""
