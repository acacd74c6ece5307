terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    # helm 2.x: the `set_sensitive {}` blocks used here changed shape in helm 3.x.
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.17.0, < 3.0.0"
    }
  }
}
