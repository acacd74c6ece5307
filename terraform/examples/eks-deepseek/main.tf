module "cluster" {
  source = "../../modules/gpu-cluster-eks"

  name                                 = var.name
  kubernetes_version                   = var.kubernetes_version
  availability_zones                   = var.availability_zones
  cluster_endpoint_public_access_cidrs = var.admin_cidr_blocks
  gpu_accelerator_label                = var.gpu_accelerator_label
  max_total_gpus                       = var.max_total_gpus
  grafana_admin_password               = random_password.grafana_admin.result

  # Two GPU groups so attention and expert actors scale independently; both
  # start at zero nodes and cost nothing until a Ray pod asks for a GPU.
  gpu_node_groups = [
    {
      name           = "gpu-attention"
      instance_types = var.gpu_instance_types
      capacity_type  = var.gpu_capacity_type
      min_size       = 0
      max_size       = var.attention_max_nodes
      labels         = { "expertmesh.io/role" = "attention" }
    },
    {
      name           = "gpu-experts"
      instance_types = var.gpu_instance_types
      capacity_type  = var.gpu_capacity_type
      min_size       = 0
      max_size       = var.experts_max_nodes
      labels         = { "expertmesh.io/role" = "experts" }
    },
  ]

  tags = var.tags
}

resource "random_password" "api_key" {
  length  = 48
  special = false # travels in an HTTP header
}

resource "random_password" "grafana_admin" {
  length  = 24
  special = false
}

resource "kubernetes_namespace" "expertmesh" {
  metadata {
    name = "expertmesh"
    labels = {
      "app.kubernetes.io/part-of" = "expertmesh"
    }
  }

  depends_on = [module.cluster]
}

# The Ray Serve ingress checks the Bearer token against this key.
resource "kubernetes_secret" "api_key" {
  metadata {
    name      = "expertmesh-api-key"
    namespace = kubernetes_namespace.expertmesh.metadata[0].name
  }

  type = "Opaque"
  data = {
    "api-key" = random_password.api_key.result
  }
}

# Read by the model-loader Job as a file; only made when a token is given.
resource "kubernetes_secret" "hf_token" {
  count = var.hf_token == "" ? 0 : 1

  metadata {
    name      = "expertmesh-hf-token"
    namespace = kubernetes_namespace.expertmesh.metadata[0].name
  }

  type = "Opaque"
  data = {
    token = var.hf_token
  }
}
