provider "google" {
  project = var.project_id
  region  = local.region
}

locals {
  region = length(split("-", var.location)) == 3 ? join("-", slice(split("-", var.location), 0, 2)) : var.location
}

# OAuth token of the identity running Terraform (gcloud application-default
# credentials); it is refreshed on every plan/apply.
data "google_client_config" "default" {}

provider "kubernetes" {
  host                   = "https://${module.cluster.cluster_endpoint}"
  token                  = data.google_client_config.default.access_token
  cluster_ca_certificate = base64decode(module.cluster.cluster_ca_certificate)
}

provider "helm" {
  kubernetes {
    host                   = "https://${module.cluster.cluster_endpoint}"
    token                  = data.google_client_config.default.access_token
    cluster_ca_certificate = base64decode(module.cluster.cluster_ca_certificate)
  }
}

provider "kubectl" {
  host                   = "https://${module.cluster.cluster_endpoint}"
  token                  = data.google_client_config.default.access_token
  cluster_ca_certificate = base64decode(module.cluster.cluster_ca_certificate)
  load_config_file       = false
}
