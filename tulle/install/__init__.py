"""Installing Tulle on Kubernetes: the bundled charts (charts/), rendered by the Helm engine
(render.py), with the secrets an installation needs (material.py, credentials.py, values.py)
and what an installed control plane already holds (cluster.py)."""
