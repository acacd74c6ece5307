# IRSA roles: each controller's service account assumes a role scoped to what it
# does, instead of widening the node instance role (which pods cannot reach:
# the node groups' IMDS hop limit is 1, main.tf).

module "cluster_autoscaler_irsa" {
  # checkov:skip=CKV_TF_1: registry module pinned to an exact version (the project rule); a registry source cannot take a commit hash, and published registry versions do not change.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.39.0"

  role_name                        = "${var.name}-cluster-autoscaler"
  attach_cluster_autoscaler_policy = true
  cluster_autoscaler_cluster_names = [module.eks.cluster_name]

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["kube-system:${local.cluster_autoscaler_sa}"]
    }
  }

  tags = local.tags
}

module "efs_csi_irsa" {
  # checkov:skip=CKV_TF_1: registry module pinned to an exact version (the project rule); a registry source cannot take a commit hash, and published registry versions do not change.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.39.0"

  role_name             = "${var.name}-efs-csi"
  attach_efs_csi_policy = true

  oidc_providers = {
    main = {
      provider_arn = module.eks.oidc_provider_arn
      namespace_service_accounts = [
        "kube-system:efs-csi-controller-sa",
        "kube-system:efs-csi-node-sa",
      ]
    }
  }

  tags = local.tags
}

module "vpc_cni_irsa" {
  # checkov:skip=CKV_TF_1: registry module pinned to an exact version (the project rule); a registry source cannot take a commit hash, and published registry versions do not change.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.39.0"

  role_name             = "${var.name}-vpc-cni"
  attach_vpc_cni_policy = true
  vpc_cni_enable_ipv4   = true

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["kube-system:aws-node"]
    }
  }

  tags = local.tags
}
