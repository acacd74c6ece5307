variable "region" {
  description = "AWS region, e.g. us-east-1. Pick one where your account has P-instance quota and p5 capacity."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region such as us-east-1."
  }
}

variable "availability_zones" {
  description = "Zones of the cluster's subnets, in var.region. Include zones where the GPU instance type is offered: aws ec2 describe-instance-type-offerings --location-type availability-zone --filters Name=instance-type,Values=p5.48xlarge."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b", "us-east-1c"]

  validation {
    condition     = length(var.availability_zones) >= 2 && alltrue([for z in var.availability_zones : can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", z))])
    error_message = "availability_zones must list at least two zone names such as us-east-1a."
  }
}

variable "name" {
  description = "Cluster name."
  type        = string
  default     = "expertmesh-deepseek"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "name must be 3-39 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version."
  type        = string
  default     = "1.33"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must look like \"1.33\"."
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
  description = "The expertmesh container image you built with `make image` and pushed to a registry the nodes can pull from (e.g. <account>.dkr.ecr.<region>.amazonaws.com/expertmesh:0.1.0). Replaces expertmesh:0.1.0 in the KubeRay manifests."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(:[A-Za-z0-9._-]+|@sha256:[a-f0-9]{64})$", var.image))
    error_message = "image must be a pushed image reference with a registry host and a tag or digest, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/expertmesh:0.1.0."
  }
}

variable "gpu_instance_types" {
  description = "Instance types of both GPU groups. All must carry the GPU named by gpu_accelerator_label (p5.48xlarge: 8x H100; p4d.24xlarge: 8x A100)."
  type        = list(string)
  default     = ["p5.48xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0 && alltrue([for t in var.gpu_instance_types : can(regex("^(p[0-9][a-z]*|g[0-9][a-z]*)\\.[0-9]*x?large$", t))])
    error_message = "gpu_instance_types must be EC2 GPU instance types (p* or g* families), e.g. p5.48xlarge."
  }
}

variable "gpu_accelerator_label" {
  description = "GPU type label of the GPU nodes (nvidia-h100 for p5, nvidia-a100 for p4d); the autoscaler's GPU limit counts this type."
  type        = string
  default     = "nvidia-h100"

  validation {
    condition     = can(regex("^nvidia-[a-z0-9-]+$", var.gpu_accelerator_label))
    error_message = "gpu_accelerator_label must look like nvidia-h100."
  }
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT for both GPU groups. SPOT p5 capacity is cheaper but can be reclaimed with two minutes' notice."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.gpu_capacity_type)
    error_message = "gpu_capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "attention_max_nodes" {
  description = "Maximum nodes of the gpu-attention group (attention actors, MLA KV cache). It scales from 0."
  type        = number
  default     = 2

  validation {
    condition     = var.attention_max_nodes >= 1 && floor(var.attention_max_nodes) == var.attention_max_nodes
    error_message = "attention_max_nodes must be a positive integer."
  }
}

variable "experts_max_nodes" {
  description = "Maximum nodes of the gpu-experts group (expert shard actors). It scales from 0."
  type        = number
  default     = 4

  validation {
    condition     = var.experts_max_nodes >= 1 && floor(var.experts_max_nodes) == var.experts_max_nodes
    error_message = "experts_max_nodes must be a positive integer."
  }
}

variable "max_total_gpus" {
  description = "Cluster-wide GPU ceiling enforced by the cluster autoscaler (cost guard)."
  type        = number
  default     = 48

  validation {
    condition     = var.max_total_gpus >= 1 && floor(var.max_total_gpus) == var.max_total_gpus
    error_message = "max_total_gpus must be a positive integer."
  }
}

variable "model_source" {
  description = "What the model-loader Job puts on the models volume: builtin:<preset> (tiny, small: random weights written by expertmesh init-model, no download) or hf:<repository> (safetensors from the Hugging Face Hub)."
  type        = string
  default     = "hf:deepseek-ai/DeepSeek-V2-Lite-Chat"
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

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default = {
    project = "expertmesh"
  }
}
