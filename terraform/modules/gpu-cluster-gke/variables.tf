variable "project_id" {
  description = "GCP project that hosts the network and the cluster."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a valid GCP project ID (6-30 lowercase letters, digits, '-')."
  }
}

variable "name" {
  description = "Cluster name; also the prefix of the network, subnetwork, router and node service account."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,24}[a-z0-9]$", var.name))
    error_message = "name must be 3-26 lowercase letters, digits or '-', starting with a letter (the node service account ID adds a suffix)."
  }
}

variable "location" {
  description = "Region (regional cluster, control plane replicated over zones) or zone (zonal cluster, cheaper, one control-plane zone), e.g. us-central1 or us-central1-a."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+(-[a-z])?$", var.location))
    error_message = "location must be a GCP region (us-central1) or zone (us-central1-a)."
  }
}

variable "release_channel" {
  description = "GKE release channel that picks and upgrades the Kubernetes version."
  type        = string
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "min_master_version" {
  description = "Optional minimum Kubernetes version of the control plane, e.g. \"1.33\". null lets the release channel decide."
  type        = string
  default     = null

  validation {
    condition     = var.min_master_version == null || can(regex("^1\\.[0-9]{2}", var.min_master_version))
    error_message = "min_master_version must be null or a version such as \"1.33\"."
  }
}

variable "subnet_cidr" {
  description = "Primary IPv4 range of the subnetwork (node addresses)."
  type        = string
  default     = "10.10.0.0/20"

  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0))
    error_message = "subnet_cidr must be a valid IPv4 CIDR."
  }
}

variable "pods_cidr" {
  description = "Secondary range of the subnetwork for pod IPs (VPC-native cluster)."
  type        = string
  default     = "10.16.0.0/14"

  validation {
    condition     = can(cidrhost(var.pods_cidr, 0))
    error_message = "pods_cidr must be a valid IPv4 CIDR."
  }
}

variable "services_cidr" {
  description = "Secondary range of the subnetwork for Service ClusterIPs."
  type        = string
  default     = "10.20.0.0/20"

  validation {
    condition     = can(cidrhost(var.services_cidr, 0))
    error_message = "services_cidr must be a valid IPv4 CIDR."
  }
}

variable "master_ipv4_cidr_block" {
  description = "/28 range for the control plane's private endpoint (private nodes reach the API through it)."
  type        = string
  default     = "172.16.0.0/28"

  validation {
    condition     = can(cidrhost(var.master_ipv4_cidr_block, 0)) && endswith(var.master_ipv4_cidr_block, "/28")
    error_message = "master_ipv4_cidr_block must be a /28 IPv4 CIDR."
  }
}

variable "master_authorized_networks" {
  description = "CIDRs allowed to reach the public control-plane endpoint (where Terraform, kubectl and helm run from). Use your office or VPN egress, not 0.0.0.0/0."
  type = list(object({
    cidr_block   = string
    display_name = string
  }))

  validation {
    condition     = length(var.master_authorized_networks) > 0 && alltrue([for n in var.master_authorized_networks : can(cidrhost(n.cidr_block, 0))])
    error_message = "master_authorized_networks must be a non-empty list with valid IPv4 CIDRs."
  }
}

variable "system_node_pool" {
  description = "CPU node pool for the KubeRay operator, Prometheus/Grafana and Ray head pods. Labelled expertmesh.io/pool=system. Sizes are per zone of the pool."
  type = object({
    machine_type = optional(string, "n2-standard-8")
    min_size     = optional(number, 1)
    max_size     = optional(number, 3)
    disk_size_gb = optional(number, 100)
  })
  default = {}

  validation {
    condition     = var.system_node_pool.min_size >= 1 && var.system_node_pool.max_size >= var.system_node_pool.min_size
    error_message = "system_node_pool needs min_size >= 1 and max_size >= min_size."
  }

  validation {
    condition     = var.system_node_pool.disk_size_gb >= 50
    error_message = "system_node_pool.disk_size_gb must be at least 50."
  }
}

variable "gpu_node_pools" {
  description = <<-EOT
    GPU node pools. Each one is tainted nvidia.com/gpu=true:NoSchedule, labelled
    expertmesh.io/pool=<name>, gets its NVIDIA driver installed by GKE (LATEST) and may scale
    to zero (min_size = 0). min_size/max_size count nodes across all the pool's zones.
    node_locations narrows the zones (GPU machine types exist only in some zones);
    null uses the cluster's zones.
  EOT
  type = list(object({
    name              = string
    machine_type      = string
    accelerator_type  = string
    accelerator_count = number
    min_size          = number
    max_size          = number
    spot              = optional(bool, false)
    labels            = optional(map(string), {})
    disk_size_gb      = optional(number, 500)
    disk_type         = optional(string, "pd-ssd")
    node_locations    = optional(list(string))
  }))

  validation {
    condition     = length(var.gpu_node_pools) > 0
    error_message = "gpu_node_pools must hold at least one pool."
  }

  validation {
    condition     = length(distinct([for p in var.gpu_node_pools : p.name])) == length(var.gpu_node_pools)
    error_message = "gpu_node_pools names must be unique."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : can(regex("^[a-z][a-z0-9-]{0,30}[a-z0-9]$", p.name)) && p.name != "system"])
    error_message = "Each GPU pool name must be 2-32 lowercase letters, digits or '-', start with a letter, and not be \"system\"."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : p.min_size >= 0])
    error_message = "Each GPU pool needs min_size >= 0 (0 lets the pool scale to zero)."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : p.max_size >= p.min_size && p.max_size >= 1])
    error_message = "Each GPU pool needs max_size >= min_size and max_size >= 1."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : can(regex("^nvidia-", p.accelerator_type))])
    error_message = "accelerator_type must be a GKE NVIDIA accelerator such as nvidia-h100-80gb, nvidia-a100-80gb or nvidia-l4."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : contains([1, 2, 4, 8, 16], p.accelerator_count)])
    error_message = "accelerator_count must be 1, 2, 4, 8 or 16 and match the machine type."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : p.disk_size_gb >= 100 && contains(["pd-ssd", "pd-balanced", "hyperdisk-balanced"], p.disk_type)])
    error_message = "Each GPU pool needs disk_size_gb >= 100 and disk_type pd-ssd, pd-balanced or hyperdisk-balanced."
  }

  validation {
    condition     = alltrue([for p in var.gpu_node_pools : !contains(keys(p.labels), "expertmesh.io/pool")])
    error_message = "Do not set the expertmesh.io/pool label yourself: it is always the pool name."
  }
}

variable "max_total_gpus" {
  description = "Cluster-wide upper bound, per accelerator type, on the GPUs the autoscaler may run at once (a cost guard on top of each pool's max_size)."
  type        = number
  default     = 32

  validation {
    condition     = var.max_total_gpus >= 1 && floor(var.max_total_gpus) == var.max_total_gpus
    error_message = "max_total_gpus must be a positive integer."
  }
}

variable "max_total_cpu_cores" {
  description = "Cluster-wide upper bound on vCPUs, required by GKE alongside the GPU limits. An a3-highgpu-8g node has 208 vCPUs."
  type        = number
  default     = 2000

  validation {
    condition     = var.max_total_cpu_cores >= 8
    error_message = "max_total_cpu_cores must be at least 8."
  }
}

variable "max_total_memory_gb" {
  description = "Cluster-wide upper bound on memory in GB, required by GKE alongside the GPU limits. An a3-highgpu-8g node has 1872 GB."
  type        = number
  default     = 16000

  validation {
    condition     = var.max_total_memory_gb >= 32
    error_message = "max_total_memory_gb must be at least 32."
  }
}

variable "autoscaling_profile" {
  description = "GKE cluster autoscaler profile: OPTIMIZE_UTILIZATION removes idle (GPU) nodes sooner; BALANCED keeps them longer."
  type        = string
  default     = "OPTIMIZE_UTILIZATION"

  validation {
    condition     = contains(["OPTIMIZE_UTILIZATION", "BALANCED"], var.autoscaling_profile)
    error_message = "autoscaling_profile must be OPTIMIZE_UTILIZATION or BALANCED."
  }
}

variable "filestore_tier" {
  description = "Filestore tier of the expertmesh-models StorageClass: standard (HDD, 1 TiB minimum), premium (SSD, 2.5 TiB minimum), enterprise or zonal."
  type        = string
  default     = "premium"

  validation {
    condition     = contains(["standard", "premium", "enterprise", "zonal"], var.filestore_tier)
    error_message = "filestore_tier must be standard, premium, enterprise or zonal."
  }
}

variable "models_reclaim_policy" {
  description = "Reclaim policy of the expertmesh-models StorageClass. Retain keeps the Filestore instance and its weights when the PVC is deleted (and keeps billing for it); Delete removes them."
  type        = string
  default     = "Retain"

  validation {
    condition     = contains(["Retain", "Delete"], var.models_reclaim_policy)
    error_message = "models_reclaim_policy must be Retain or Delete."
  }
}

variable "deletion_protection" {
  description = "Refuse to destroy the GKE cluster while true. Set false before `terraform destroy`."
  type        = bool
  default     = true
}

variable "grafana_admin_password" {
  description = "Password of Grafana's admin user (kube-prometheus-stack). Replaces the chart's well-known default."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.grafana_admin_password) >= 12
    error_message = "grafana_admin_password must be at least 12 characters."
  }
}

variable "labels" {
  description = "GCP labels added to the cluster and its nodes' VMs."
  type        = map(string)
  default     = {}
}
