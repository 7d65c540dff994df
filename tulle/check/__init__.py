"""`tulle check`: is this installation healthy? Linkerd's `linkerd check`, for Tulle.

A pure core and thin adapters, as everywhere in Tulle:

  core       results (√ success, ‼ warning, × error, each not-√ with a hint), checks,
             categories, evaluation, and the table / short / json renderings
  identity   the trust anchors and issuer checks both modes share
  local      the facts of a local run (`tulle up`) and the checks over them
  cluster    the facts of a Kubernetes installation and the checks over them
  gather_local, gather_cluster
             the adapters: read the run record, probe processes, read the bus; read the
             Kubernetes API through the official client. Each returns a facts object.

A check is a small function `facts -> Outcome | None` (None: does not apply here, so it
is not shown). Everything it needs was gathered before, so a check never does I/O and
is tested in microseconds.
"""
