variable "image" {
  description = "The expertmesh image the cluster pulls (built with `make image` and pushed); it replaces `expertmesh:0.1.0` in the manifests."
  type        = string
  validation {
    condition     = length(trimspace(var.image)) > 0
    error_message = "image must name the pushed expertmesh image."
  }
}

variable "model_source" {
  description = "What the model-loader Job puts on the models volume: builtin:<preset> (tiny, small: random weights written by expertmesh init-model, no download) or hf:<repository> (safetensors from the Hugging Face Hub)."
  type        = string
  validation {
    condition     = can(regex("^(builtin:(tiny|small)|hf:[A-Za-z0-9._-]+/[A-Za-z0-9._-]+)$", var.model_source))
    error_message = "model_source must be builtin:tiny, builtin:small or hf:<owner>/<repository>."
  }
}

variable "hf_token" {
  description = "Hugging Face token for a gated repository; empty for none. Stored in the Secret expertmesh/expertmesh-hf-token."
  type        = string
  default     = ""
  sensitive   = true
}

variable "apply_finetune_job" {
  description = "Also submit the LoRA fine-tune RayJob (infra/k8s/rayjob-finetune.yaml). It takes GPU nodes until it finishes."
  type        = bool
  default     = false
}

variable "monitoring_namespace" {
  description = "Namespace of kube-prometheus-stack, whose Grafana sidecar loads the dashboard ConfigMap."
  type        = string
}
