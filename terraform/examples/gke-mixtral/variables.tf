variable "project_id" {
  description = "GCP project to create the cluster in. It needs NVIDIA_H100_GPUS quota in the region."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a valid GCP project ID."
  }
}

variable "location" {
  description = "Region (regional cluster) or zone (zonal cluster, cheaper control plane SLA, one zone) of the cluster, e.g. us-central1 or us-central1-a."
  type        = string
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+(-[a-z])?$", var.location))
    error_message = "location must be a GCP region (us-central1) or zone (us-central1-a)."
  }
}

variable "gpu_zones" {
  description = "Zones of the GPU node pools, where a3-highgpu-8g is offered and you hold quota, e.g. [\"us-central1-a\", \"us-central1-c\"]. null uses the cluster's zones."
  type        = list(string)
  default     = null

  validation {
    condition     = var.gpu_zones == null || alltrue([for z in coalesce(var.gpu_zones, []) : can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", z))])
    error_message = "gpu_zones must be null or a list of zones such as us-central1-a."
  }
}

variable "name" {
  description = "Cluster name."
  type        = string
  default     = "expertmesh-mixtral"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,24}[a-z0-9]$", var.name))
    error_message = "name must be 3-26 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "admin_cidr_blocks" {
  description = "CIDRs allowed to reach the Kubernetes API (your workstation, office or VPN egress), e.g. [\"203.0.113.10/32\"]."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidr_blocks) > 0 && alltrue([for c in var.admin_cidr_blocks : can(cidrhost(c, 0))])
    error_message = "admin_cidr_blocks must be a non-empty list of valid IPv4 CIDRs."
  }
}

variable "image" {
  description = "The expertmesh container image you built with `make image` and pushed to a registry the nodes can pull from (e.g. us-central1-docker.pkg.dev/<project>/expertmesh/expertmesh:0.1.0). Replaces expertmesh:0.1.0 in the KubeRay manifests."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(:[A-Za-z0-9._-]+|@sha256:[a-f0-9]{64})$", var.image))
    error_message = "image must be a pushed image reference with a registry host and a tag or digest, e.g. us-central1-docker.pkg.dev/my-project/expertmesh/expertmesh:0.1.0."
  }
}

variable "gpu_spot" {
  description = "Run both GPU pools on Spot VMs (much cheaper, can be preempted at any time)."
  type        = bool
  default     = false
}

variable "attention_max_nodes" {
  description = "Maximum nodes of the gpu-attention pool (attention actors, KV cache). It scales from 0."
  type        = number
  default     = 1

  validation {
    condition     = var.attention_max_nodes >= 1 && floor(var.attention_max_nodes) == var.attention_max_nodes
    error_message = "attention_max_nodes must be a positive integer."
  }
}

variable "experts_max_nodes" {
  description = "Maximum nodes of the gpu-experts pool (expert shard actors). It scales from 0."
  type        = number
  default     = 2

  validation {
    condition     = var.experts_max_nodes >= 1 && floor(var.experts_max_nodes) == var.experts_max_nodes
    error_message = "experts_max_nodes must be a positive integer."
  }
}

variable "max_total_gpus" {
  description = "Cluster-wide H100 ceiling enforced by the GKE autoscaler (cost guard)."
  type        = number
  default     = 24

  validation {
    condition     = var.max_total_gpus >= 1 && floor(var.max_total_gpus) == var.max_total_gpus
    error_message = "max_total_gpus must be a positive integer."
  }
}

variable "model_source" {
  description = "What the model-loader Job puts on the models volume: builtin:<preset> (tiny, small: random weights written by expertmesh init-model, no download) or hf:<repository> (safetensors from the Hugging Face Hub)."
  type        = string
  default     = "hf:mistralai/Mixtral-8x7B-Instruct-v0.1"
  validation {
    condition     = can(regex("^(builtin:(tiny|small)|hf:[A-Za-z0-9._-]+/[A-Za-z0-9._-]+)$", var.model_source))
    error_message = "model_source must be builtin:tiny, builtin:small or hf:<owner>/<repository>."
  }
}

variable "hf_token" {
  description = "Hugging Face token for a gated repository (Mixtral, Llama-based models); empty for none. Stored in the Secret expertmesh/expertmesh-hf-token."
  type        = string
  default     = ""
  sensitive   = true
}

variable "apply_finetune_job" {
  description = "Also submit the LoRA fine-tune RayJob (infra/k8s/rayjob-finetune.yaml). It takes GPU nodes until it finishes."
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Protect the GKE cluster from `terraform destroy`. false suits a trial cluster; set true for one you keep."
  type        = bool
  default     = false
}

variable "labels" {
  description = "GCP labels added to the cluster and its VMs."
  type        = map(string)
  default = {
    project = "expertmesh"
  }
}
