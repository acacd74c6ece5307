terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    # gpu_driver_installation_config and node pool total_*_node_count need a
    # recent 6.x google provider.
    google = {
      source  = "hashicorp/google"
      version = ">= 6.20.0, < 7.0.0"
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
