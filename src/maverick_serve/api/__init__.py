"""Types shared by the routing layer and the serving deployments: the OpenAI request models
and the engine work item (protocol), OpenAI-shaped errors, and the engine-client seam."""
