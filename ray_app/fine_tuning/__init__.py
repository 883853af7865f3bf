"""OpenAI's fine-tuning API on ray_app: training files, and jobs that run Ray Train on this cluster
(or at a cloud provider, for a cloud base model) and serve their result at once."""
