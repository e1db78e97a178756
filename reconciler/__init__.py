"""dora-reconciler: Argo CD deployments to Apache DevLake deployment records, for DORA metrics."""

__version__ = "0.1.0"
