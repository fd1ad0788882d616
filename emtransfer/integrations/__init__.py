"""Integrations of emtransfer with serving engines (vLLM, SGLang).

Each lives in its own module and imports its engine only when that module is imported, so
``import emtransfer`` never needs either engine installed.
"""
