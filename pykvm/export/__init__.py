"""Exports: a disk's BlockBackend served over a network protocol, without a VM.

``export.nbd``: an NBD server (the fixed newstyle protocol of the NBD project's
doc/proto.md), wired by ``serve.NbdExport`` for ``pykvm serve --nbd``.
"""
