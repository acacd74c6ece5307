terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    # AL2023_x86_64_NVIDIA node groups and EKS module 20.37 need aws >= 5.95.
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.95.0, < 6.0.0"
    }
    # helm 2.x: the provider-level `kubernetes {}` block and `set_sensitive {}`
    # blocks used here changed shape in helm 3.x.
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.17.0, < 3.0.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.36.0, < 3.0.0"
    }
  }
}
