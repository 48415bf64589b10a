"""The Ray Serve deployments and their builder: the Router (OpenAI REST ingress), engine and
prefill replicas, the replica-state hub; `up` and `status`."""
