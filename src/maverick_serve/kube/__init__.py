"""Kubernetes side: render and check the Helm chart against the code, read a RayService's status."""
