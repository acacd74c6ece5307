module "cluster" {
  source = "../../modules/gpu-cluster-gke"

  project_id                 = var.project_id
  name                       = var.name
  location                   = var.location
  master_authorized_networks = [for c in var.admin_cidr_blocks : { cidr_block = c, display_name = "admin ${c}" }]
  max_total_gpus             = var.max_total_gpus
  deletion_protection        = var.deletion_protection
  grafana_admin_password     = random_password.grafana_admin.result
  labels                     = var.labels

  # Two GPU pools so attention and expert actors scale independently; both
  # start at zero nodes and cost nothing until a Ray pod asks for a GPU.
  gpu_node_pools = [
    {
      name              = "gpu-attention"
      machine_type      = "a3-highgpu-8g"
      accelerator_type  = "nvidia-h100-80gb"
      accelerator_count = 8
      min_size          = 0
      max_size          = var.attention_max_nodes
      spot              = var.gpu_spot
      node_locations    = var.gpu_zones
      labels            = { "expertmesh.io/role" = "attention" }
    },
    {
      name              = "gpu-experts"
      machine_type      = "a3-highgpu-8g"
      accelerator_type  = "nvidia-h100-80gb"
      accelerator_count = 8
      min_size          = 0
      max_size          = var.experts_max_nodes
      spot              = var.gpu_spot
      node_locations    = var.gpu_zones
      labels            = { "expertmesh.io/role" = "experts" }
    },
  ]
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
