data "aws_region" "current" {}

locals {
  # Zones are listed explicitly (not discovered): GPU instance types exist only
  # in some zones of a region, and a zone AWS adds later must not move subnets.
  azs = var.availability_zones

  tags = merge(var.tags, {
    "expertmesh.io/cluster" = var.name
    "managed-by"            = "terraform"
  })
}

module "vpc" {
  # checkov:skip=CKV_TF_1: registry module pinned to an exact version (the project rule); a registry source cannot take a commit hash, and published registry versions do not change.
  source  = "terraform-aws-modules/vpc/aws"
  version = "5.21.0"

  name = var.name
  cidr = var.vpc_cidr
  azs  = local.azs

  # /20 private subnets: the VPC CNI gives every pod a VPC address and a p5 node
  # can host many Ray worker pods.
  private_subnets = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 4, i)]
  public_subnets  = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, 200 + i)]

  enable_nat_gateway     = true
  single_nat_gateway     = var.single_nat_gateway
  one_nat_gateway_per_az = !var.single_nat_gateway
  enable_dns_hostnames   = true
  enable_dns_support     = true

  public_subnet_tags = {
    "kubernetes.io/role/elb" = "1"
  }
  private_subnet_tags = {
    "kubernetes.io/role/internal-elb" = "1"
  }

  tags = local.tags
}

module "eks" {
  # checkov:skip=CKV_TF_1: registry module pinned to an exact version (the project rule); a registry source cannot take a commit hash, and published registry versions do not change.
  source  = "terraform-aws-modules/eks/aws"
  version = "20.37.2"

  cluster_name    = var.name
  cluster_version = var.kubernetes_version

  # Public endpoint limited to the operator's CIDRs so Terraform/helm/kubectl can
  # reach it; nodes talk to the private endpoint.
  cluster_endpoint_public_access       = true
  cluster_endpoint_public_access_cidrs = var.cluster_endpoint_public_access_cidrs
  cluster_endpoint_private_access      = true

  # The identity running Terraform becomes cluster admin (EKS access entry), so the
  # kubernetes/helm/kubectl providers can install add-ons right after creation.
  enable_cluster_creator_admin_permissions = true

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  cluster_addons = {
    coredns                = {}
    kube-proxy             = {}
    eks-pod-identity-agent = {}
    vpc-cni = {
      # The CNI must exist before nodes join or they never become Ready.
      before_compute = true
      # Its AWS calls (ENIs, IPs) go through its own IRSA role, not the node role.
      service_account_role_arn = module.vpc_cni_irsa.iam_role_arn
      # The add-on enforces no NetworkPolicy unless asked to: without this the
      # policy of infra/k8s would leave Ray's GCS, client, job and data-plane
      # ports open to every pod of the cluster. The add-on's schema types the
      # value as a string.
      configuration_values = jsonencode({
        enableNetworkPolicy = "true"
      })
    }
    aws-efs-csi-driver = {
      service_account_role_arn = module.efs_csi_irsa.iam_role_arn
    }
  }

  eks_managed_node_group_defaults = {
    # IMDSv2 only, and a hop limit of 1: a pod on the pod network cannot reach
    # the instance metadata service, so no pod can take the node role's
    # credentials. What needs instance metadata runs on the host network (the
    # CNI, the EFS CSI node plugin, the pod identity agent); what calls AWS
    # does it with its own IRSA role (iam.tf).
    metadata_options = {
      http_endpoint               = "enabled"
      http_tokens                 = "required"
      http_put_response_hop_limit = 1
    }
    # The CNI's permissions live on its IRSA role, not on every node.
    iam_role_attach_cni_policy = false
  }

  eks_managed_node_groups = merge(local.system_node_group, local.gpu_node_groups)

  tags = local.tags
}
