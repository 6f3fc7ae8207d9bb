"""Integrations of metactl with host training libraries (installed as ``metactl.adapters``)."""
