provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

locals {
  # Short-lived tokens from the AWS CLI instead of a static kubeconfig; the
  # identity running Terraform is the cluster creator and thus an admin.
  eks_exec_auth = {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", module.cluster.cluster_name, "--region", var.region]
  }
}

provider "kubernetes" {
  host                   = module.cluster.cluster_endpoint
  cluster_ca_certificate = base64decode(module.cluster.cluster_certificate_authority_data)

  exec {
    api_version = local.eks_exec_auth.api_version
    command     = local.eks_exec_auth.command
    args        = local.eks_exec_auth.args
  }
}

provider "helm" {
  kubernetes {
    host                   = module.cluster.cluster_endpoint
    cluster_ca_certificate = base64decode(module.cluster.cluster_certificate_authority_data)

    exec {
      api_version = local.eks_exec_auth.api_version
      command     = local.eks_exec_auth.command
      args        = local.eks_exec_auth.args
    }
  }
}

provider "kubectl" {
  host                   = module.cluster.cluster_endpoint
  cluster_ca_certificate = base64decode(module.cluster.cluster_certificate_authority_data)
  load_config_file       = false

  exec {
    api_version = local.eks_exec_auth.api_version
    command     = local.eks_exec_auth.command
    args        = local.eks_exec_auth.args
  }
}
