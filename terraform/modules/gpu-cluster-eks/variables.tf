variable "name" {
  description = "Cluster name; also the prefix of the VPC, IAM roles and the EFS file system."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,37}[a-z0-9]$", var.name))
    error_message = "name must be 3-39 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version, e.g. \"1.33\". Keep it in EKS standard support."
  type        = string
  default     = "1.33"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version)) && try(tonumber(split(".", var.kubernetes_version)[1]) >= 31, false)
    error_message = "kubernetes_version must look like \"1.33\" and be 1.31 or newer."
  }
}

variable "vpc_cidr" {
  description = "CIDR of the VPC created for the cluster. Private (node) and public (NAT, load balancer) subnets are carved from it."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) <= 18, false)
    error_message = "vpc_cidr must be a valid IPv4 CIDR of /18 or larger (GPU pods take many VPC CNI addresses)."
  }
}

variable "availability_zones" {
  description = "Availability zones of the cluster's subnets, e.g. [\"us-east-1a\", \"us-east-1b\", \"us-east-1c\"]. Include the zones where your GPU instance type is offered (aws ec2 describe-instance-type-offerings --location-type availability-zone)."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 6 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "availability_zones must list 2 to 6 distinct zones (EKS needs subnets in at least two)."
  }

  validation {
    condition     = alltrue([for z in var.availability_zones : can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", z))]) && length(distinct([for z in var.availability_zones : substr(z, 0, length(z) - 1)])) == 1
    error_message = "availability_zones must be zone names (us-east-1a) of a single region."
  }
}

variable "single_nat_gateway" {
  description = "Use one NAT gateway for all zones (cheaper, one zone is a single point of failure for egress) instead of one per zone."
  type        = bool
  default     = true
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint (where Terraform, kubectl and helm run from). Use your office or VPN egress, not 0.0.0.0/0."
  type        = list(string)

  validation {
    condition     = length(var.cluster_endpoint_public_access_cidrs) > 0 && alltrue([for c in var.cluster_endpoint_public_access_cidrs : can(cidrhost(c, 0))])
    error_message = "cluster_endpoint_public_access_cidrs must be a non-empty list of valid IPv4 CIDRs."
  }
}

variable "system_node_group" {
  description = "CPU node group for cluster add-ons, the KubeRay operator, Prometheus/Grafana and Ray head pods. Labelled expertmesh.io/pool=system."
  type = object({
    instance_types = optional(list(string), ["m6i.2xlarge"])
    min_size       = optional(number, 2)
    max_size       = optional(number, 4)
    desired_size   = optional(number, 2)
    disk_size_gb   = optional(number, 100)
  })
  default = {}

  validation {
    condition     = var.system_node_group.min_size >= 1 && var.system_node_group.max_size >= var.system_node_group.min_size
    error_message = "system_node_group needs min_size >= 1 (CoreDNS and the autoscaler live there) and max_size >= min_size."
  }

  validation {
    condition     = var.system_node_group.desired_size >= var.system_node_group.min_size && var.system_node_group.desired_size <= var.system_node_group.max_size
    error_message = "system_node_group.desired_size must lie between min_size and max_size."
  }

  validation {
    condition     = length(var.system_node_group.instance_types) > 0 && var.system_node_group.disk_size_gb >= 50
    error_message = "system_node_group needs at least one instance type and disk_size_gb >= 50."
  }
}

variable "gpu_node_groups" {
  description = <<-EOT
    GPU managed node groups. Each one is tainted nvidia.com/gpu=true:NoSchedule, labelled
    expertmesh.io/pool=<name> and nvidia.com/gpu.present=true, and may scale to zero
    (min_size = 0): the cluster autoscaler brings nodes up when a Ray pod asks for them.
    gpus_per_node is the GPU count of the instance type (8 for p5/p4d); the autoscaler needs
    it to plan a scale-up from zero, when no node exists to read it from.
  EOT
  type = list(object({
    name           = string
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = optional(number, 0)
    capacity_type  = optional(string, "ON_DEMAND")
    labels         = optional(map(string), {})
    disk_size_gb   = optional(number, 500)
    gpus_per_node  = optional(number, 8)
  }))

  validation {
    condition     = length(var.gpu_node_groups) > 0
    error_message = "gpu_node_groups must hold at least one group."
  }

  validation {
    condition     = length(distinct([for g in var.gpu_node_groups : g.name])) == length(var.gpu_node_groups)
    error_message = "gpu_node_groups names must be unique."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : can(regex("^[a-z][a-z0-9-]{0,30}[a-z0-9]$", g.name)) && g.name != "system"])
    error_message = "Each GPU group name must be 2-32 lowercase letters, digits or '-', start with a letter, and not be \"system\"."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : g.min_size >= 0])
    error_message = "Each GPU group needs min_size >= 0 (0 lets the group scale to zero)."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : g.max_size >= g.min_size && g.max_size >= 1])
    error_message = "Each GPU group needs max_size >= min_size and max_size >= 1."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : g.desired_size >= g.min_size && g.desired_size <= g.max_size])
    error_message = "Each GPU group's desired_size must lie between its min_size and max_size."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : contains(["ON_DEMAND", "SPOT"], g.capacity_type)])
    error_message = "capacity_type must be ON_DEMAND or SPOT."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : length(g.instance_types) > 0])
    error_message = "Each GPU group needs at least one instance type."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : g.disk_size_gb >= 100 && g.gpus_per_node >= 1 && floor(g.gpus_per_node) == g.gpus_per_node])
    error_message = "Each GPU group needs disk_size_gb >= 100 (container image plus model cache) and an integer gpus_per_node >= 1."
  }

  validation {
    condition     = alltrue([for g in var.gpu_node_groups : !contains(keys(g.labels), "expertmesh.io/pool")])
    error_message = "Do not set the expertmesh.io/pool label yourself: it is always the group name."
  }
}

variable "gpu_ami_type" {
  description = "EKS-optimized accelerated AMI for the GPU groups. It ships the NVIDIA driver and container toolkit; the device plugin is installed by this module."
  type        = string
  default     = "AL2023_x86_64_NVIDIA"

  validation {
    condition     = contains(["AL2023_x86_64_NVIDIA", "BOTTLEROCKET_x86_64_NVIDIA"], var.gpu_ami_type)
    error_message = "gpu_ami_type must be AL2023_x86_64_NVIDIA or BOTTLEROCKET_x86_64_NVIDIA."
  }
}

variable "gpu_accelerator_label" {
  description = "Value of the k8s.amazonaws.com/accelerator label put on every GPU node (e.g. nvidia-h100, nvidia-a100). The cluster autoscaler counts GPUs per value of this label for its --gpu-total limit, so all GPU groups of one cluster share it."
  type        = string
  default     = "nvidia-h100"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{0,62}$", var.gpu_accelerator_label))
    error_message = "gpu_accelerator_label must be a valid Kubernetes label value (lowercase letters, digits, '.', '-')."
  }
}

variable "max_total_gpus" {
  description = "Upper bound on the number of GPUs the cluster autoscaler may run at once across all GPU groups (a cost guard on top of each group's max_size)."
  type        = number
  default     = 32

  validation {
    condition     = var.max_total_gpus >= 1 && floor(var.max_total_gpus) == var.max_total_gpus
    error_message = "max_total_gpus must be a positive integer."
  }
}

variable "cluster_autoscaler_expander" {
  description = "How the cluster autoscaler picks a node group when several fit a pending pod: least-waste (fewest idle GPUs/CPUs after scale-up), most-pods or random."
  type        = string
  default     = "least-waste"

  validation {
    condition     = contains(["least-waste", "most-pods", "random"], var.cluster_autoscaler_expander)
    error_message = "cluster_autoscaler_expander must be least-waste, most-pods or random."
  }
}

variable "scale_down_unneeded_time" {
  description = "How long a node must stay unneeded before the cluster autoscaler removes it, e.g. \"10m\". Short saves GPU money; long avoids re-loading weights after a traffic dip."
  type        = string
  default     = "10m"

  validation {
    condition     = can(regex("^[0-9]+[smh]$", var.scale_down_unneeded_time))
    error_message = "scale_down_unneeded_time must be a duration such as 90s, 10m or 1h."
  }
}

variable "efs_throughput_mode" {
  description = "Throughput mode of the EFS file system holding model weights: elastic (pay per transfer, fast bursts when many pods load weights) or bursting."
  type        = string
  default     = "elastic"

  validation {
    condition     = contains(["elastic", "bursting"], var.efs_throughput_mode)
    error_message = "efs_throughput_mode must be elastic or bursting."
  }
}

variable "efs_kms_key_arn" {
  description = "ARN of a customer-managed KMS key for EFS encryption at rest. null uses the AWS-managed aws/elasticfilesystem key."
  type        = string
  default     = null

  validation {
    condition     = var.efs_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.efs_kms_key_arn))
    error_message = "efs_kms_key_arn must be null or a KMS key ARN."
  }
}

variable "models_reclaim_policy" {
  description = "Reclaim policy of the expertmesh-models StorageClass. Retain keeps downloaded weights (hundreds of GB) when the PVC is deleted; Delete removes them."
  type        = string
  default     = "Retain"

  validation {
    condition     = contains(["Retain", "Delete"], var.models_reclaim_policy)
    error_message = "models_reclaim_policy must be Retain or Delete."
  }
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

variable "tags" {
  description = "Tags added to every AWS resource the module creates."
  type        = map(string)
  default     = {}
}
