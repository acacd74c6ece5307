# Model weights live on EFS so every Ray pod on every node mounts the same copy
# (ReadWriteMany): the loader Job downloads once, workers read in parallel.

resource "aws_efs_file_system" "models" {
  # checkov:skip=CKV_AWS_184: a customer-managed key is opt-in through var.efs_kms_key_arn; by default the AWS-managed aws/elasticfilesystem key encrypts the data at rest.
  # checkov:skip=CKV2_AWS_18: holds public model checkpoints that the loader Job can download again; AWS Backup of hundreds of GB of weights would cost more than it protects.
  creation_token   = "${var.name}-models"
  encrypted        = true
  kms_key_id       = var.efs_kms_key_arn
  performance_mode = "generalPurpose"
  throughput_mode  = var.efs_throughput_mode

  lifecycle_policy {
    transition_to_ia = "AFTER_30_DAYS"
  }

  tags = merge(local.tags, { Name = "${var.name}-models" })
}

resource "aws_security_group" "efs" {
  name_prefix = "${var.name}-efs-"
  description = "NFS from EKS nodes to the expertmesh model-weights EFS mount targets"
  vpc_id      = module.vpc.vpc_id

  ingress {
    description     = "NFS from cluster nodes"
    from_port       = 2049
    to_port         = 2049
    protocol        = "tcp"
    security_groups = [module.eks.node_security_group_id]
  }

  tags = merge(local.tags, { Name = "${var.name}-efs" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_efs_mount_target" "models" {
  count = length(local.azs)

  file_system_id  = aws_efs_file_system.models.id
  subnet_id       = module.vpc.private_subnets[count.index]
  security_groups = [aws_security_group.efs.id]
}

resource "kubernetes_storage_class" "models" {
  metadata {
    name = "expertmesh-models"
  }

  storage_provisioner = "efs.csi.aws.com"
  reclaim_policy      = var.models_reclaim_policy
  volume_binding_mode = "Immediate"

  # Dynamic provisioning: each PVC becomes an EFS access point under /expertmesh
  # with its own POSIX owner; EFS volumes are ReadWriteMany.
  parameters = {
    provisioningMode = "efs-ap"
    fileSystemId     = aws_efs_file_system.models.id
    directoryPerms   = "700"
    basePath         = "/expertmesh"
  }

  depends_on = [module.eks, aws_efs_mount_target.models]
}
