"""Scale out: kiln's serving app as a Ray Serve application, KubeRay manifests for Kubernetes.

``config`` is plain data (no Ray import), so configs and manifests can be written and checked on
a machine without Ray; ``ray_serve`` needs the ``ray`` extra (``pip install 'kiln[ray]'``).
"""
